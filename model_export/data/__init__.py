"""The images a build works on: offline ID and OOD sources, the config's splits, GReg's auxiliary
outliers, the client path (what clients send, simulated) and the benchmark's feature cache."""
