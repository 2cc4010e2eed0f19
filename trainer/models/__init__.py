"""Model access: the ModelBundle protocol, the layout name map and the runtimes."""
