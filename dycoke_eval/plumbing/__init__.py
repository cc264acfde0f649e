"""Model plumbing (attention routing, hooks, caches), kept apart from the methods' maths."""
