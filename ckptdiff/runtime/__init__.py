"""How a run behaves as a process: signals as interrupts, torchrun ranks, progress lines."""
