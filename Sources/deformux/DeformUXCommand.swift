import ArgumentParser
import DeformUX

@main
struct DeformUXCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "deformux",
        abstract: "DeformUX-Net on the CPU: kernels, benchmarks (the network, training and segment come next).",
        version: "0.1.0",
        subcommands: [Bench.self, SummaryCommand.self]
    )
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks that print their figures (build with -c release and a CPU target).",
        subcommands: [BenchDDC.self, BenchModel.self, BenchBackward.self, BenchTrain.self, BenchConv.self]
    )
}
