"""Files on disk: the run directory and atomic writes, directories a command made, damaged inputs."""
