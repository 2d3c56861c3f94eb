"""What a borrower did to its server session, read off the SQL it sent, and the undo.

A pooled session must look new to its next borrower.  Rather than reset every session
on every release (one round trip per request) or never (state leaks into the next
request), the driver layer (``herokupool.tracked``) passes each statement a borrower
runs through :func:`changes`, ORs the returned flags into the connection's record, and
on release sends :func:`undo` of exactly what happened, in one round trip, or nothing
for the common loan that changed nothing.

Recognised, as Amazon RDS Proxy recognises them for pinning:

=============================================  ==========  ==============================
statement                                      flag        undone with
=============================================  ==========  ==============================
``SET x``, ``SET SESSION x``, ``RESET x``,     ``GUC``     ``RESET ALL``
``SET SESSION CHARACTERISTICS``,
``set_config(name, value, <not true>)``
``SET ROLE``, ``SET SESSION AUTHORIZATION``,   ``ROLE``    ``SET SESSION AUTHORIZATION
a setting change that mentions a role                      DEFAULT; RESET ROLE``
(``SET "role"``, ``set_config('role', ...)``,
``set_config(<not a literal>, ...)``)
``LISTEN``                                     ``LISTEN``  ``UNLISTEN *``
``PREPARE``                                    ``PREPARE`` ``DEALLOCATE ALL``
``CREATE TEMP ...``, ``SELECT ... INTO TEMP``,  ``TEMP``    ``DISCARD TEMP``
any mention of ``pg_temp``
``pg_advisory_lock[_shared]``,                 ``LOCK``    ``SELECT pg_advisory_unlock_all()``
``pg_try_advisory_lock[_shared]``
``DECLARE ... WITH HOLD``                      ``CURSOR``  ``CLOSE ALL``
``LOAD``                                       ``LOAD``    nothing can: the session is closed
=============================================  ==========  ==============================

Transaction-scoped forms change nothing that outlives the loan and are ignored: ``SET
LOCAL``, ``SET TRANSACTION``, ``SET CONSTRAINTS``, ``set_config(..., true)``,
``pg_advisory_xact_lock``.  Statements that only go back towards a new session's state
(``RESET ROLE``, ``UNLISTEN``, ``DEALLOCATE``, ``DISCARD``, ``CLOSE``,
``pg_advisory_unlock*``) need no undo; ``RESET ROLE``, ``SET ROLE NONE``, ``SET SESSION
AUTHORIZATION DEFAULT`` and ``DISCARD ALL`` do report :data:`ROLE_RESET`, because they
end a role the backend assumed (``assume_role``), which it must then assume again.

Statements are read twice when they hold comments or double quotes: as sent, and with
those removed (``SET/**/ROLE``, ``"set_config"(``).  A ``set_config`` whose arguments hold
a comment, an escape string or a dollar quote counts as session-wide.

Not seen: statements run inside functions and ``DO`` blocks (``PERFORM set_config(...)``,
``EXECUTE 'SET ...'``), whose text is the server's.  ``OPTIONS["RESET"]`` (e.g.
``DISCARD ALL``) covers those.  The classifier errs towards an undo: a false alarm costs
one round trip, a miss leaks state.

Cost: most statements are decided by one ``lower()`` and a few substring tests; only a
statement that starts with a keyword of the table, holds a ``;`` or mentions
``set_config``, ``advisory`` or ``temp`` is read by a regular expression.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Final

__all__ = [
    "CURSOR",
    "FORGETS",
    "GUC",
    "LISTEN",
    "LOAD",
    "LOCK",
    "PREPARE",
    "ROLE",
    "ROLE_RESET",
    "TEMP",
    "SessionNotReusable",
    "changes",
    "changes_and_forgets",
    "forgets_prepared",
    "prepared_names",
    "undo",
]


class SessionNotReusable(ValueError):
    """Raised by a driver layer's ``prepare_release`` when the session cannot be made new
    again (``LOAD``, state the driver cannot restore): the pool then closes it."""


GUC: Final = 1
ROLE: Final = 2
LISTEN: Final = 4
PREPARE: Final = 8
TEMP: Final = 16
LOCK: Final = 32
CURSOR: Final = 64
#: Cannot be undone: the session must be closed.
LOAD: Final = 128
#: Not state to undo: a role assumed by the backend ended (see the module docstring).
ROLE_RESET: Final = 256
#: Not state to undo, reported by :func:`changes_and_forgets` only: the statement may make
#: the server forget prepared statements (``DEALLOCATE``, ``DISCARD ALL``), which a driver
#: that prepares statements itself must hear of (see :func:`forgets_prepared`).
FORGETS: Final = 512

#: The undo for each flag, in the order sent: the session's own user first, so that the
#: rest runs with the privileges the session started with.
_UNDO: Final = (
    (ROLE, "SET SESSION AUTHORIZATION DEFAULT; RESET ROLE"),
    (CURSOR, "CLOSE ALL"),
    (LISTEN, "UNLISTEN *"),
    (PREPARE, "DEALLOCATE ALL"),
    (TEMP, "DISCARD TEMP"),
    (LOCK, "SELECT pg_advisory_unlock_all()"),
    (GUC, "RESET ALL"),
)

# Statements that may start with one of these words are read in full; so is any
# statement behind a comment, which the full reading skips.
_KEYWORDS: Final = (
    "set",
    "reset",
    "listen",
    "prepare",
    "create",
    "declare",
    "load",
    "discard",
    "/*",
    "--",
)

_SPACE = r"(?:\s|/\*.*?\*/|--[^\n]*(?:\n|$))"
# One statement's leading keywords: after the start of the text or a semicolon, and any
# whitespace and comments.  The run of whitespace and comments is matched possessively
# (``*+``), one character or comment at a time: a run that no keyword follows (an indented
# line after a semicolon, in a trigger's body) is then given up at once instead of being
# re-split in exponentially many ways.
_STATEMENT = re.compile(
    rf"(?:^|;){_SPACE}*+("
    r"set\s+(?:session\s+)?(?:role|authorization|characteristics)\b"
    r"|set\s+local\b|set\s+transaction\b|set\s+constraints\b|set\b|reset\b|discard\b"
    r"|listen\b|prepare\s+transaction\b|prepare\b|declare\b|load\b"
    r"|create\b[^;]*?\b(?:temp|temporary)\s+(?:recursive\s+)?(?:table|view|sequence)\b"
    r"|create\b[^;]*?\bpg_temp\s*\."
    r")",
    re.DOTALL,
)
_ROLE_RESETS = re.compile(
    r"set\s+(?:session\s+)?role\s+none\b"
    r"|set\s+session\s+authorization\s+default\b"
    r"|reset\s+(?:role|session\s+authorization|session_authorization)\b"
    r"|discard\s+all\b"
)
_TRANSACTION_SCOPED = re.compile(r"set\s+(?:local|transaction|constraints)\b")
_SET_CONFIG = re.compile(r"\bset_config\s*\(")
_ADVISORY = re.compile(r"\bpg_(?:try_)?advisory_lock(?:_shared)?\s*\(")
_INTO_TEMP = re.compile(r"\binto\s+(?:temp|temporary|unlogged\s+temp)\b|\binto\s+pg_temp\s*\.")
_WITH_HOLD = re.compile(r"\bwith\s+hold\b")
# A temporary object anywhere (``EXPLAIN ANALYZE CREATE TEMP TABLE ... AS``), or the
# temporary schema named (``CREATE TABLE pg_temp.t``, ``SET search_path = pg_temp``, after
# which a plain ``CREATE TABLE`` makes a temporary table).
_TEMP_ANYWHERE = re.compile(
    r"\b(?:temp|temporary)\s+(?:recursive\s+)?(?:table|view|sequence)\b|\bpg_temp"
)
# set_config's first argument, when it is a plain literal naming a setting.
_LITERAL_NAME = re.compile(r"\s*'([a-z0-9_.]*)'\s*,")
# Comments and double quotes, which the normalised reading of a statement drops.
_NOISE = re.compile(r"/\*.*?\*/|--[^\n]*|\"", re.DOTALL)
# set_config's third argument, when it is the literal true: transaction-scoped.
_LOCAL_TRUE = re.compile(r"\s*(?:true|'t'|'true'|'on'|'1')\s*\)")


def changes(sql: str) -> int:
    """The flags of the session state ``sql`` changes (0 for nearly every statement)."""
    return _changes_in(sql.lower())


def changes_and_forgets(sql: str) -> int:
    """:func:`changes`, plus :data:`FORGETS` for a statement that may make the server
    forget prepared statements: for psycopg 3, which keeps its own (one ``lower()`` for
    both questions)."""
    text = sql.lower()
    flags = _changes_in(text)
    if "dealloc" in text or "discard" in text:
        flags |= FORGETS
    return flags


def _changes_in(text: str) -> int:
    """:func:`changes` of an already lowercased statement."""
    if (
        "temp" in text
        or "set_config" in text
        or "advisory" in text
        or ";" in text
        or text.lstrip().startswith(_KEYWORDS)
    ):
        return _read(text)
    return 0


def _read(text: str) -> int:
    flags = _read_text(text)
    if "/*" in text or "--" in text or '"' in text:
        # Read again without comments and double quotes, which the expressions do not
        # expect between words (``SET/**/ROLE``, ``"set_config"(``, ``"pg_temp".t``).  Both
        # readings count: a comment's text may be inside a string literal.
        flags |= _read_text(_NOISE.sub(" ", text))
    if flags & GUC and ("role" in text or "authoriz" in text or "u&" in text):
        # ``SET "role" TO x``, ``SET session_authorization TO x``, set_config('role', ...):
        # a role change written as a setting, which RESET ALL does not undo.
        flags |= ROLE
    return flags


def _read_text(text: str) -> int:
    flags = 0
    for match in _STATEMENT.finditer(text):
        flags |= _statement_flags(text, match)
    if "set_config" in text:
        for match in _SET_CONFIG.finditer(text):
            if not _is_local(text, match.end()):
                flags |= GUC
                if not _LITERAL_NAME.match(text, match.end()):
                    flags |= ROLE  # a name given as a parameter may be 'role'
    if "advisory" in text and _ADVISORY.search(text):
        flags |= LOCK
    if "into" in text and _INTO_TEMP.search(text):
        flags |= TEMP
    if "temp" in text and _TEMP_ANYWHERE.search(text):
        flags |= TEMP
    return flags


def _statement_flags(text: str, match: re.Match[str]) -> int:
    head = match.group(1)
    word = head.split(None, 1)[0]
    if word in ("set", "reset", "discard"):
        if _ROLE_RESETS.match(text, match.start(1)):
            return ROLE_RESET
        if word != "set" or _TRANSACTION_SCOPED.match(head):
            return 0  # back towards the session's defaults, or gone with the transaction
        if head.endswith(("role", "authorization")):
            return ROLE
        return GUC
    if word == "listen":
        return LISTEN
    if word == "prepare":
        return 0 if head.startswith("prepare transaction") else PREPARE
    if word == "declare":
        semicolon = text.find(";", match.end(1))
        body = text[match.end(1) : semicolon if semicolon >= 0 else len(text)]
        return CURSOR if _WITH_HOLD.search(body) else 0
    if word == "load":
        return LOAD
    return TEMP  # create ... temp / pg_temp.


def _is_local(text: str, start: int) -> bool:
    """Whether the ``set_config(`` call whose arguments start at ``start`` has the literal
    ``true`` as its third argument.  Anything else (false, a parameter) counts as a
    session-wide change."""
    depth = 0
    commas = 0
    quoted = False
    for index in range(start, min(len(text), start + 2000)):
        char = text[index]
        if char in "\\$":
            return False  # an escape string or a dollar quote: too hard to read, undo
        if quoted:
            if char == "'":
                quoted = False
            continue
        if text.startswith(("/*", "--"), index):
            return False  # a comment: it may hide a comma
        if char == "'":
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")":
            if depth == 0:
                return False
            depth -= 1
        elif char == "," and depth == 0:
            commas += 1
            if commas == 2:
                return _LOCAL_TRUE.match(text, index + 1) is not None
    return False


def undo(flags: int, prepared: Collection[str] | None = None) -> str | None:
    """The SQL that takes a session back to a new one's state for ``flags``, as one
    string for one round trip, or None when there is nothing to undo.  ``LOAD`` cannot
    be undone: the caller closes the session instead.

    ``prepared``: the names of the statements the loan ``PREPARE``d, for a driver that
    prepares statements of its own (psycopg 3), whose statements ``DEALLOCATE ALL`` would
    drop behind its back: ``PREPARE`` is then undone by name (a name already gone is
    skipped, so an undo never fails for it).  None: ``DEALLOCATE ALL``."""
    parts = []
    for flag, sql in _UNDO:
        if flags & flag:
            if flag == PREPARE and prepared is not None:
                if not prepared:
                    continue
                sql = _deallocate(prepared)
            parts.append(sql)
    return "; ".join(parts) if parts else None


def _deallocate(names: Collection[str]) -> str:
    # A DO block rather than DEALLOCATE x: the driver's own DEALLOCATE ALL (psycopg 3 sends
    # one after a rollback) may have dropped x already, and a failing undo closes the
    # session.  Names are literals inside the block's own dollar quote, which they cannot
    # hold (prepared_names() refuses a name with a dollar sign).
    listed = ", ".join("'" + name.replace("'", "''") + "'" for name in sorted(names))
    return (
        "DO $herokupool$DECLARE n text; BEGIN FOR n IN SELECT name FROM pg_prepared_statements"
        f" WHERE name IN ({listed}) LOOP EXECUTE format('DEALLOCATE %I', n); END LOOP;"
        " END$herokupool$"
    )


# PREPARE name / DEALLOCATE [PREPARE] name|ALL, each statement's first words (read on the
# text as sent: a quoted name keeps its case).  An unquoted name is read whole or not at
# all: the server's names may go on with a dollar sign or a non-ASCII letter, and a name
# read up to one (``x`` of ``x$y``, ``h`` of ``has$ AS``) is another statement's.
_NAME = r'("(?:[^"]|"")+"|[a-z_][a-z0-9_]*(?![\w$]|[^\x00-\x7f]))'
_PREPARE_NAME = re.compile(rf"(?:^|;)\s*prepare\s+{_NAME}\s*(?:\(|as\b)", re.IGNORECASE)
_DEALLOCATE = re.compile(rf"(?:^|;)\s*deallocate\s+(?:prepare\s+)?{_NAME}", re.IGNORECASE)
_DISCARD_ALL = re.compile(r"\bdiscard\s+all\b")


def _name(token: str) -> str:
    if token.startswith('"'):
        return token[1:-1].replace('""', '"')
    return token.lower()


def prepared_names(sql: str) -> list[str] | None:
    """The names of the statements ``sql`` (which :func:`changes` found to ``PREPARE``)
    prepares, or None when they cannot all be read (a comment between the words, a name
    with a dollar sign): the caller then undoes with ``DEALLOCATE ALL``."""
    found = [_name(token) for token in _PREPARE_NAME.findall(sql)]
    prepares = sql.lower().count("prepare")
    if not found or len(found) < prepares or any("$" in name for name in found):
        return None
    return found


def forgets_prepared(sql: str) -> tuple[bool, list[str]]:
    """What ``sql`` makes the server forget of its prepared statements:
    ``(everything, names)``, ``everything`` for ``DEALLOCATE ALL``, ``DISCARD ALL`` or a
    ``DEALLOCATE`` that cannot be read.  Cheap for a statement that says neither word."""
    text = sql.lower()
    if "dealloc" not in text and "discard" not in text:
        return False, []
    if _DISCARD_ALL.search(_NOISE.sub(" ", text)):
        return True, []
    names = [_name(token) for token in _DEALLOCATE.findall(sql)]
    everything = "all" in names or len(names) < text.count("deallocate")
    return everything, [name for name in names if name != "all"]
