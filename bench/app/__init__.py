"""The benchmark's one model and one view."""
