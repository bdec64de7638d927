"""Code shared by several stages. Stage modules import from here; nothing is copied between them."""
