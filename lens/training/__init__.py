"""Training the methods that learn: one loop (:mod:`lens.training.loop`) and a trainer per method family."""
