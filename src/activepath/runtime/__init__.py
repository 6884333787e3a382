"""Process settings (allocator, garbage collector) and the scratch workspace the layers reuse."""
