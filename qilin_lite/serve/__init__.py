"""serve/: see CONTRIBUTING.md for what lives here."""
