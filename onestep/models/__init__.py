"""The model core: teacher, generator, critics and the networks, schedules and conditions they share."""
