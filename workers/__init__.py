"""Workers: the service that decodes, preprocesses and embeds catalog images and queries."""
