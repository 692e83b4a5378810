"""Point-in-time history: before-images of every change, so any kept point can be rebuilt."""
