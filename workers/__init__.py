"""Workers: a faust app that decodes, preprocesses and embeds catalog images and queries."""
