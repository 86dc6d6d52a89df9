"""Bridges to other libraries. Importing this package never imports them: each module that needs
one imports it inside the functions that use it (diffusers is a reference, never an engine)."""
