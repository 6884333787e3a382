"""The MoE pipeline, in data-flow order: routing → capacity → dispatch → experts → combine, composed by layer."""
