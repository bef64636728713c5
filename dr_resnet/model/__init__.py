"""The network: hand-written ResNets and the heads that own what its outputs mean."""
