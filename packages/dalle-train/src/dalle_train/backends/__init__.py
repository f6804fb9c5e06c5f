"""The distributed backends that need nothing but torch (registered by `dalle_train.plugin`)."""
