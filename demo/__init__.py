"""The demo Django project deployed by the Heroku button (see docs/demo.md)."""
