"""Parity checks of the port against dumps of the official implementation."""
