"""Training stage: weak labels -> pixel labels, over-segmentation, CAM, SPML losses, train loop."""
