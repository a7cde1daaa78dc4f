"""Reading, inspecting, exporting, replaying and diffing message traces."""
