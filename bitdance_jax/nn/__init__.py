"""Neural-network building blocks shared by every model family: layers, the binary diffusion head, flow matching, patch order."""
