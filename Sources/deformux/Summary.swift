import ArgumentParser
import DeformUX

/// `deformux summary`: per-module parameters and multiply-adds of a configuration.
struct SummaryCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "summary",
        abstract: "Print the network's modules with their output shapes, parameters and multiply-adds."
    )

    @OptionGroup var model: ModelOptions
    @Option(help: "Input size D,H,W (multiples of 16), or one number for a cube.") var size = "96"
    @Option(help: "Batch size.") var batch = 1

    func run() throws {
        let dims = size.split(separator: ",").compactMap { Int(String($0).trimmingCharacters(in: " ")) }
        guard dims.count == 1 || dims.count == 3 else { throw ValidationError("--size must be one number or D,H,W, got \(size)") }
        let dhw = dims.count == 1 ? [dims[0], dims[0], dims[0]] : dims
        let config = try model.config()
        let net = try DeformUXNet(config: config)
        print(try net.summary(inputShape: [batch, config.inChannels] + dhw))
    }
}
