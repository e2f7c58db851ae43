"""The node-local block cache shared by every image mounted on a node."""
