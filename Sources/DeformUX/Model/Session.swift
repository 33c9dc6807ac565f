#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// What runs a `DeformUXNet` (STYLE.md habit 16): the working memory of its forwards and backwards.
///
/// A session owns a `WeightSnapshot` (every parameter packed for its kernel or copied, refreshed only
/// when the model's weights changed, so repeated windows never re-pack them), scratch (`Workspace`) and
/// activation memory (`StoragePool`, which reuses the buffers of one call in the next, so a second
/// call of the same size allocates nothing). A forward reads the model's weights only while it
/// refreshes its snapshot (under the model's read lock); it then computes, and calls progress
/// callbacks, without holding any lock of the model. So a callback may read or even load the model's
/// weights (the running call keeps the snapshot it started with), and several sessions can run one
/// model from different threads at the same time. One session runs one call at a time: a second
/// thread waits; a re-entrant call from the session's own callback gets `.busy`.
public final class Session {
    public let model: DeformUXNet
    let snapshot: WeightSnapshot
    /// Activation memory; the workspace takes its scratch from it too (one budget).
    let pool = StoragePool()
    let workspace: Workspace
    private let exclusive = OwnedLock("session")

    public init(model: DeformUXNet) throws {
        self.model = model
        workspace = Workspace(pool: pool)
        snapshot = try WeightSnapshot(layout: model.parameters.layout, forms: model.forms)
    }

    /// Bytes the session holds between calls: packed weights, retained activations and scratch.
    public var retainedBytes: Int { snapshot.bytes + pool.retainedBytes + workspace.bytes }

    /// Frees the memory kept between calls (activations, scratch, packed weights); the next call
    /// allocates and packs again.
    public func releaseMemory() throws {
        try exclusive.withLock("Session.releaseMemory") {
            pool.trim()
            workspace.release()
            snapshot.release()
        }
    }

    /// Logits N x Cout x D x H x W (no softmax) for x N x Cin x D x H x W.
    public func forward(_ x: Tensor, progress: DeformUXNet.Progress? = nil, cancellation: Cancellation? = nil) throws -> Tensor {
        try model.validateInput(x.shape)
        let y = try Tensor(uninitialized: [x.shape[0], model.config.outChannels] + Array(x.shape.dropFirst(2)))
        try forward(x, into: y.pointer, progress: progress, cancellation: cancellation)
        return y
    }

    /// Writes the logits (N x Cout x D x H x W) into memory the caller owns (the C ABI's output array).
    /// `progress` is called between steps; `cancellation` (created on the calling thread) is consulted
    /// inside them.
    public func forward(_ x: Tensor, into y: UnsafeMutablePointer<Float>, progress: DeformUXNet.Progress? = nil,
                        cancellation: Cancellation? = nil) throws {
        let op = "DeformUXNet.forward"
        try model.validateInput(x.shape, operation: op)
        try x.requireContiguous("\(op) x")
        try exclusive.withLock(op) {
            let (ctx, steps) = try begin(op, gradients: nil, total: DeformUXNet.forwardSteps, progress: progress,
                                         cancellation: cancellation)
            defer { end() }
            let logits = try model.forwardChannelsLast(try toChannelsLast(x, pool: pool), ctx, steps.advance)
            transposeToChannelsFirst(logits, into: y)
        }
    }

    /// Adds the gradients of sum(forward(x) * gradOutput) into the model's gradient store (which the
    /// caller zeroes when a step starts: gradients accumulate), and dL/dx into `gradInput` (N x Cin x D
    /// x H x W, overwritten) if given. x and gradOutput are N x C x D x H x W like the forward's.
    /// `gradientsHeld`: the caller already holds the model's gradients (`ParameterStore.withGradients`).
    public func backward(_ x: Tensor, gradOutput: Tensor, gradInput: UnsafeMutablePointer<Float>? = nil,
                         progress: DeformUXNet.Progress? = nil, cancellation: Cancellation? = nil,
                         gradientsHeld: Bool = false) throws {
        let op = "DeformUXNet.backward"
        try model.validateInput(x.shape, operation: op)
        let expected = [x.shape[0], model.config.outChannels] + Array(x.shape.dropFirst(2))
        guard gradOutput.shape == expected else {
            throw DeformUXError.shapeMismatch(op, "grad_output must have the shape of the logits",
                                              expected: "\(expected)", got: "\(gradOutput.shape)")
        }
        try x.requireContiguous("\(op) x")
        try gradOutput.requireContiguous("\(op) grad_output")
        let store = model.parameters
        let run = {
            try self.exclusive.withLock(op) {
                let (ctx, steps) = try self.begin(op, gradients: store.gradients, total: 2 * DeformUXNet.forwardSteps,
                                                  progress: progress, cancellation: cancellation)
                defer { self.end() }
                let input = try toChannelsLast(x, pool: self.pool)
                // The logits themselves are not needed: their gradient is given.
                let tape = try self.model.forwardSaving(input, ctx, steps.advance).1
                let gLogits = try toChannelsLast(gradOutput, pool: self.pool)
                let gx = gradInput == nil ? nil : try ctx.zeros(input.shape)
                try self.model.backward(gLogits, tape, ctx, gradInput: gx, steps.advance)
                if let gx, let gradInput { transposeToChannelsFirst(gx, into: gradInput) }
            }
        }
        if gradientsHeld { try run() } else { try store.withGradients(op, run) }
    }

    /// One training step's forward and backward (the caller holds the model's gradients,
    /// `ParameterStore.withGradients`): the logits of x (N x Cin x D x H x W) go to `loss` channels-last
    /// (N x D x H x W x Cout); it returns the loss and overwrites them with dL/dlogits; then the
    /// gradients of every parameter are added into the model's gradient store (zeroed by the caller once
    /// per optimiser step). `dropPath` applies stochastic depth to the encoder blocks. Returns the loss.
    public func trainingStep(_ x: Tensor, dropPath: DropPathMasks? = nil, progress: DeformUXNet.Progress? = nil,
                             cancellation: Cancellation? = nil, loss: (Tensor) throws -> Double) throws -> Double {
        let op = "Trainer.step"
        try model.validateInput(x.shape, operation: op)
        try x.requireContiguous("\(op) images")
        return try exclusive.withLock(op) {
            let (ctx, steps) = try begin(op, gradients: model.parameters.gradients, total: 2 * DeformUXNet.forwardSteps,
                                         progress: progress, cancellation: cancellation)
            defer { end() }
            ctx.dropPath = dropPath
            let input = try toChannelsLast(x, pool: pool)
            let (logits, tape) = try model.forwardSaving(input, ctx, steps.advance)
            let value = try loss(logits)
            try model.backward(logits, tape, ctx, gradInput: nil, steps.advance)
            return value
        }
    }

    /// Counts steps, reports them and honours cancellation between them.
    final class Steps {
        let total: Int
        let op: String
        let progress: DeformUXNet.Progress?
        let cancellation: Cancellation?
        var done = 0

        init(_ op: String, total: Int, progress: DeformUXNet.Progress?, cancellation: Cancellation?) {
            self.op = op; self.total = total; self.progress = progress; self.cancellation = cancellation
        }

        /// DEFORMUX_TRACE=1 prints, after every step, its wall and CPU seconds and the activation memory
        /// (a developer's tool).
        static let trace = getenv("DEFORMUX_TRACE") != nil
        weak var pool: StoragePool?
        weak var workspace: Workspace?
        var lastWall = Cancellation.now(), lastCPU = Steps.cpuSeconds()

        static func cpuSeconds() -> Double {
            var u = rusage()
            getrusage(RUSAGE_SELF.rawValue, &u)
            return Double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + Double(u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6
        }

        func advance(_ name: String) throws {
            done += 1
            if Steps.trace, let pool, let workspace {
                let live = pool.liveBytes
                let wall = Cancellation.now(), cpu = Steps.cpuSeconds()
                print("deformux trace: \(op) step \(done)/\(total) \(name): \(decimal(wall - lastWall, 3)) s, cpu \(decimal(cpu - lastCPU, 3)) s; activations \(live.now >> 20) MB (peak \(live.peak >> 20) MB), retained \(pool.retainedBytes >> 20) MB, scratch \(workspace.bytes >> 20) MB")
                lastWall = wall
                lastCPU = cpu
            }
            try cancellation?.check(op, "during \(name)")
            if let progress, !progress(done, total) {
                cancellation?.cancel()
                throw DeformUXError.cancelled(op, "cancelled after step \(done) of \(total) (\(name))")
            }
        }
    }

    /// Refreshes the snapshot and sets up the call's context and step counter.
    private func begin(_ op: String, gradients: UnsafeMutablePointer<Float>?, total: Int,
                       progress: DeformUXNet.Progress?, cancellation: Cancellation?) throws -> (RunContext, Steps) {
        let s = Steps(op, total: total, progress: progress, cancellation: cancellation)
        s.pool = pool
        s.workspace = workspace
        workspace.cancellation = cancellation
        try snapshot.refresh(from: model.parameters, operation: op)
        let ctx = RunContext(weights: snapshot, workspace: workspace, pool: pool, gradients: gradients,
                             layout: model.parameters.layout)
        return (ctx, s)
    }

    private func end() {
        workspace.cancellation = nil
        // Scratch goes back to the pool between calls: held by the workspace it would count as live from
        // the next call's first step and raise its peak by the size of the largest scratch (the encoder's
        // backward, at its end); in the pool it is reused by the same requests, or by others of its size.
        workspace.release()
        // Memory kept for sizes this call did not use goes back to the system.
        pool.endPass()
    }
}
