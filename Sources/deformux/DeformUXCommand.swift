import ArgumentParser
import DeformUX

@main
struct DeformUXCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "deformux",
        abstract: "DeformUX-Net on the CPU: segmentation of NIfTI volumes, the network's summary, benchmarks.",
        version: "0.1.0",
        subcommands: [Predict.self, Bench.self, SummaryCommand.self]
    )
}

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks that print their figures (build with -c release and a CPU target).",
        subcommands: [BenchDDC.self, BenchModel.self, BenchBackward.self, BenchTrain.self, BenchConv.self,
                      BenchSegment.self]
    )
}
