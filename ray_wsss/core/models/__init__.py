"""Model definitions: a ViT exposing attention, MCTformer, DeepLab-V2. Methods pick theirs (core.methods)."""
