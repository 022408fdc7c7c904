"""Sizing, run reports and comparison tables / plots."""
