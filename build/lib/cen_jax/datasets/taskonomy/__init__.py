"""Taskonomy domains for CEN image translation (manual download)."""
