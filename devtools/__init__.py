"""Developer tools for herokupool: not part of the installed package."""
