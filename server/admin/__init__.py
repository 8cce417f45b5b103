"""The admin API: load, replace, list and unload adapters while the server runs."""
