"""The embedded demo: procedural garments in FashionGen's schema (garments), the tiny model kit
(kit) and its pretraining (pretrain), and the one check the demo's prompts allow (colour)."""
