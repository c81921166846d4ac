"""One module per PEFT method, each implementing `jaxft.peft.protocol.Method`; `jaxft.peft.registry` lists them."""
