"""The binary tokenizer: sign-quantized convolutional autoencoder, its API and its command line."""
