"""nsam's service layer: gRPC edge, engine, state store, consolidation worker. No tensor math."""
