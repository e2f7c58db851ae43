"""Process plumbing shared by the runner, the node agent and snapshots: starting and watching
processes (spawn) and the system calls that set up mounts and namespaces (syscalls)."""
