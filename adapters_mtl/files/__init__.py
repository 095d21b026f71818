"""Adapter folders on disk: our card + PEFT's files (both ways), safe reads, checksums, fingerprints."""
