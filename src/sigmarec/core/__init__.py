"""Run directories, atomic artifacts, manifests and the stage pipeline (shared by every stage)."""
