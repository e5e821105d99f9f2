"""The bundled demo: synthetic medical-style data that a tiny model can learn on CPU in minutes."""
