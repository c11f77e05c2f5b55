"""Exporters: pure packers of canonical codes into each runtime's native format."""
