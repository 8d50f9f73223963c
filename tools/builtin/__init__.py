"""Built-in tools shipped with setpoint."""
