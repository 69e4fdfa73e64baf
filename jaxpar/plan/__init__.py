"""`jaxpar plan`: the layout search, its cost model, hardware profiles and the compile check."""
