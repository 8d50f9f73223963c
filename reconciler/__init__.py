"""setpoint."""
