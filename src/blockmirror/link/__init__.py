"""The replication link: wire codec (:mod:`.protocol`) and peer authentication (:mod:`.auth`)."""
