"""The phantom's anatomy, painted back to front onto a Canvas (see build.paint_subject)."""
