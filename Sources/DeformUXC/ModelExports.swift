// The network behind opaque handles (deformux.h): dfx_model_* for the model (weights: configuration,
// parameters, gradients) and dfx_session_* for what runs it (working memory, packed weights). Calls on
// a model take its weights' read or write lock only for as long as they touch the weights; a session
// runs one call at a time and never holds a model lock while it computes or calls back.
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import DeformUX

final class ModelHandle {
    let net: DeformUXNet
    /// C copies of the parameter names, alive as long as the handle (nil only if strdup failed).
    let names: [UnsafeMutablePointer<CChar>?]
    /// The report of the last load, as text; guarded by `reportLock`.
    private var lastReport = ""
    private let reportLock = ShortLock()

    init(_ net: DeformUXNet) {
        self.net = net
        names = net.parameters.layout.entries.map { strdup($0.name) }
    }

    deinit { for p in names { free(p) } }

    var report: String {
        get { reportLock.withLock { lastReport } }
        set { reportLock.withLock { lastReport = newValue } }
    }

    /// Parameter `index` of the layout, checked.
    func entry(_ index: Int64, _ op: String) throws -> ParameterLayout.Entry {
        let entries = net.parameters.layout.entries
        guard index >= 0, index < Int64(entries.count) else {
            throw DeformUXError.invalidArgument(op, "no parameter with this index", expected: "0..<\(entries.count)",
                                                got: "\(index)")
        }
        return entries[Int(index)]
    }
}

final class SessionHandle {
    let session: Session
    /// Keeps the model handle (and so the model) alive as long as the session.
    let model: ModelHandle
    init(_ session: Session, _ model: ModelHandle) { self.session = session; self.model = model }
}

private func handle(_ p: OpaquePointer?, _ op: String) throws -> ModelHandle {
    guard let p else { throw DeformUXError.invalidArgument(op, "model must not be NULL") }
    return Unmanaged<ModelHandle>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

private func sessionHandle(_ p: OpaquePointer?, _ op: String) throws -> SessionHandle {
    guard let p else { throw DeformUXError.invalidArgument(op, "session must not be NULL") }
    return Unmanaged<SessionHandle>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

private func string(_ p: UnsafePointer<CChar>?, _ op: String, _ name: String) throws -> String {
    guard let p else { throw DeformUXError.invalidArgument(op, "\(name) must not be NULL") }
    return String(cString: p)
}

/// Copies `text` into buf, truncated to cap - 1 bytes and always NUL-terminated when cap > 0, and
/// reports the bytes the whole text needs (its length + 1): the caller knows the copy is complete when
/// *needed <= cap, and asks again with a larger buffer otherwise (the text may have grown meanwhile).
/// Every text output of the C ABI goes through here (NIfTIExports.swift too).
func copyOut(_ text: String, _ buf: UnsafeMutablePointer<CChar>?, _ cap: Int64,
             _ needed: UnsafeMutablePointer<Int64>?, _ op: String) throws {
    guard cap >= 0 else { throw DeformUXError.invalidArgument(op, "cap must be >= 0", got: "\(cap)") }
    let bytes = Array(text.utf8)
    needed?.pointee = Int64(bytes.count + 1)
    guard let buf, cap > 0 else { return }
    let n = min(bytes.count, Int(cap) - 1)
    bytes.withUnsafeBufferPointer { b in
        if let base = b.baseAddress, n > 0 { UnsafeMutableRawPointer(buf).copyMemory(from: base, byteCount: n) }
    }
    buf[n] = 0
}

/// The five sizes of an input or output, checked (non-negative; the model validates the rest).
private func sizes(_ op: String, _ n: Int64, _ d: Int64, _ h: Int64, _ w: Int64) throws -> (Int, Int, Int, Int) {
    for (name, v) in [("n", n), ("d", d), ("h", h), ("w", w)] where v < 0 {
        throw DeformUXError.invalidArgument(op, "\(name) must be >= 0", got: "\(v)")
    }
    return (Int(n), Int(d), Int(h), Int(w))
}

// MARK: Model

@_cdecl("dfx_model_create")
public func dfx_model_create(_ configJSON: UnsafePointer<CChar>?, _ seed: UInt64,
                             _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guarded {
        let op = "model_create"
        guard let out else { throw DeformUXError.invalidArgument(op, "out must not be NULL") }
        out.pointee = nil
        let config = try DeformUXNetConfig(json: string(configJSON, op, "config_json"))
        let h = ModelHandle(try DeformUXNet(config: config, seed: seed))
        out.pointee = OpaquePointer(Unmanaged.passRetained(h).toOpaque())
    }
}

@_cdecl("dfx_model_free")
public func dfx_model_free(_ model: OpaquePointer?) {
    guard let model else { return }
    Unmanaged<ModelHandle>.fromOpaque(UnsafeRawPointer(model)).release()
}

@_cdecl("dfx_model_config_json")
public func dfx_model_config_json(_ model: OpaquePointer?, _ buf: UnsafeMutablePointer<CChar>?, _ cap: Int64,
                                  _ needed: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded {
        try copyOut(try handle(model, "model_config_json").net.config.json, buf, cap, needed, "model_config_json")
    }
}

@_cdecl("dfx_model_num_parameters")
public func dfx_model_num_parameters(_ model: OpaquePointer?, _ out: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded {
        let h = try handle(model, "model_num_parameters")
        guard let out else { throw DeformUXError.invalidArgument("model_num_parameters", "out must not be NULL") }
        out.pointee = Int64(h.net.parameterCount)
    }
}

@_cdecl("dfx_model_channels")
public func dfx_model_channels(_ model: OpaquePointer?, _ inChannels: UnsafeMutablePointer<Int32>?,
                               _ outChannels: UnsafeMutablePointer<Int32>?) -> Int32 {
    guarded {
        let c = try handle(model, "model_channels").net.config
        inChannels?.pointee = Int32(c.inChannels)
        outChannels?.pointee = Int32(c.outChannels)
    }
}

@_cdecl("dfx_model_num_tensors")
public func dfx_model_num_tensors(_ model: OpaquePointer?, _ out: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded {
        let h = try handle(model, "model_num_tensors")
        guard let out else { throw DeformUXError.invalidArgument("model_num_tensors", "out must not be NULL") }
        out.pointee = Int64(h.net.parameters.layout.entries.count)
    }
}

/// Name (valid while the model lives), rank and shape (up to 8 sizes) of parameter `index`.
@_cdecl("dfx_model_tensor_info")
public func dfx_model_tensor_info(_ model: OpaquePointer?, _ index: Int64, _ name: UnsafeMutablePointer<UnsafePointer<CChar>?>?,
                                  _ rank: UnsafeMutablePointer<Int32>?, _ shape: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded {
        let op = "model_tensor_info"
        let h = try handle(model, op)
        let e = try h.entry(index, op)
        guard e.shape.count <= 8 else { throw DeformUXError.internal(op, "\(e.name) has rank \(e.shape.count) > 8") }
        guard let cName = h.names[Int(index)] else { throw DeformUXError.outOfMemory(op, "no memory for a name") }
        name?.pointee = UnsafePointer(cName)
        rank?.pointee = Int32(e.shape.count)
        if let shape { for (i, s) in e.shape.enumerated() { shape[i] = Int64(s) } }
    }
}

/// Copies parameter `index` (count floats), or its gradient, into out.
private func copyParameter(_ model: OpaquePointer?, _ index: Int64, _ out: UnsafeMutablePointer<Float>?,
                           _ count: Int64, gradient: Bool, _ op: String) throws {
    let h = try handle(model, op)
    let e = try h.entry(index, op)
    guard let out else { throw DeformUXError.invalidArgument(op, "out must not be NULL") }
    guard count == Int64(e.count) else {
        throw DeformUXError.shapeMismatch(op, "the buffer does not fit \(e.name)", expected: "\(e.count) floats",
                                          got: "\(count)")
    }
    let store = h.net.parameters
    if gradient {
        try store.withGradients(op) { out.update(from: store.gradients + e.offset, count: e.count) }
    } else {
        try store.read(op) { _ in out.update(from: store.values + e.offset, count: e.count) }
    }
}

@_cdecl("dfx_model_get_tensor")
public func dfx_model_get_tensor(_ model: OpaquePointer?, _ index: Int64, _ out: UnsafeMutablePointer<Float>?,
                                 _ count: Int64) -> Int32 {
    guarded { try copyParameter(model, index, out, count, gradient: false, "model_get_tensor") }
}

@_cdecl("dfx_model_get_grad")
public func dfx_model_get_grad(_ model: OpaquePointer?, _ index: Int64, _ out: UnsafeMutablePointer<Float>?,
                               _ count: Int64) -> Int32 {
    guarded { try copyParameter(model, index, out, count, gradient: true, "model_get_grad") }
}

@_cdecl("dfx_model_zero_grad")
public func dfx_model_zero_grad(_ model: OpaquePointer?) -> Int32 {
    guarded {
        let store = try handle(model, "model_zero_grad").net.parameters
        try store.withGradients("model_zero_grad") { store.zeroGradients() }
    }
}

/// Loads `count` named float32 tensors (names[i], data[i], ranks[i], shapes[8 * i ..< 8 * i + ranks[i]]).
@_cdecl("dfx_model_load_tensors")
public func dfx_model_load_tensors(_ model: OpaquePointer?, _ count: Int64,
                                   _ names: UnsafePointer<UnsafePointer<CChar>?>?,
                                   _ data: UnsafePointer<UnsafePointer<Float>?>?,
                                   _ ranks: UnsafePointer<Int32>?, _ shapes: UnsafePointer<Int64>?,
                                   _ strict: Int32) -> Int32 {
    guarded {
        let op = "model_load_state_dict"
        let h = try handle(model, op)
        guard count >= 0 else { throw DeformUXError.invalidArgument(op, "count must be >= 0", got: "\(count)") }
        var items: [Safetensors.Item] = []
        if count > 0 {
            guard let names, let data, let ranks, let shapes else {
                throw DeformUXError.invalidArgument(op, "names, data, ranks and shapes must not be NULL")
            }
            for i in 0..<Int(count) {
                let name = try string(names[i], op, "names[\(i)]")
                guard let values = data[i] else { throw DeformUXError.invalidArgument(op, "data for \(name) is NULL") }
                let r = Int(ranks[i])
                guard (0...8).contains(r) else {
                    throw DeformUXError.invalidArgument(op, "\(name) has too high a rank", expected: "at most 8", got: "\(r)")
                }
                let shape = (0..<r).map { Int(shapes[8 * i + $0]) }
                items.append(Safetensors.Item(name: name, shape: shape, values: values))
            }
        }
        h.report = try h.net.loadStateDict(items, strict: strict != 0).description
    }
}

@_cdecl("dfx_model_load")
public func dfx_model_load(_ model: OpaquePointer?, _ path: UnsafePointer<CChar>?, _ strict: Int32) -> Int32 {
    guarded {
        let h = try handle(model, "model_load")
        let p = try string(path, "model_load", "path")
        h.report = try h.net.load(from: p, strict: strict != 0).description
    }
}

/// The text report of the last load (counts, then the missing, unexpected and mis-shaped names).
@_cdecl("dfx_model_last_report")
public func dfx_model_last_report(_ model: OpaquePointer?, _ buf: UnsafeMutablePointer<CChar>?, _ cap: Int64,
                                  _ needed: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded {
        try copyOut(try handle(model, "model_last_report").report, buf, cap, needed, "model_last_report")
    }
}

@_cdecl("dfx_model_save")
public func dfx_model_save(_ model: OpaquePointer?, _ path: UnsafePointer<CChar>?) -> Int32 {
    guarded {
        let h = try handle(model, "model_save")
        try h.net.save(to: try string(path, "model_save", "path"))
    }
}

/// The per-module summary for an input N x Cin x D x H x W, as text.
@_cdecl("dfx_model_summary")
public func dfx_model_summary(_ model: OpaquePointer?, _ n: Int64, _ d: Int64, _ hh: Int64, _ w: Int64,
                              _ buf: UnsafeMutablePointer<CChar>?, _ cap: Int64, _ needed: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded {
        let h = try handle(model, "model_summary")
        let (n, d, hh, w) = try sizes("model_summary", n, d, hh, w)
        let s = try h.net.summary(inputShape: [n, h.net.config.inChannels, d, hh, w])
        try copyOut(s.description, buf, cap, needed, "model_summary")
    }
}

// MARK: Session

/// Called between steps of a long call with (done, total), and periodically during long steps with
/// the same numbers; returns non-zero to cancel.
public typealias ProgressCallback = @convention(c) (UnsafeMutableRawPointer?, Int64, Int64) -> Int32

/// The C callback as a session's progress (between steps) and cancellation (polled during steps with
/// the last step count reported).
/// Calls the caller's callback with (done, total); true to go on. The calling thread does not count as
/// engine activity meanwhile (the callback may wait for the GIL that a forking thread holds).
func report(_ cb: ProgressCallback, _ user: UnsafeMutableRawPointer?, _ done: Int64, _ total: Int64) -> Bool {
    EngineActivity.outside { cb(user, done, total) == 0 }
}

func callbacks(_ cb: ProgressCallback?, _ user: UnsafeMutableRawPointer?, total: Int)
    -> (DeformUXNet.Progress?, Cancellation?) {
    guard let cb else { return (nil, nil) }
    final class Last { var done = 0 }
    let last = Last()
    let progress: DeformUXNet.Progress = { done, total in
        last.done = done
        return report(cb, user, Int64(done), Int64(total))
    }
    return (progress, Cancellation(poll: { report(cb, user, Int64(last.done), Int64(total)) }))
}

@_cdecl("dfx_session_create")
public func dfx_session_create(_ model: OpaquePointer?, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guarded {
        let op = "session_create"
        guard let out else { throw DeformUXError.invalidArgument(op, "out must not be NULL") }
        out.pointee = nil
        let m = try handle(model, op)
        let s = SessionHandle(try Session(model: m.net), m)
        out.pointee = OpaquePointer(Unmanaged.passRetained(s).toOpaque())
    }
}

@_cdecl("dfx_session_free")
public func dfx_session_free(_ session: OpaquePointer?) {
    guard let session else { return }
    Unmanaged<SessionHandle>.fromOpaque(UnsafeRawPointer(session)).release()
}

/// The input x (N x Cin x D x H x W) of a session call, borrowed.
private func input(_ s: SessionHandle, _ x: UnsafePointer<Float>?, _ n: Int64, _ d: Int64, _ h: Int64, _ w: Int64,
                   _ op: String) throws -> Tensor {
    let (n, d, h, w) = try sizes(op, n, d, h, w)
    let shape = [n, s.model.net.config.inChannels, d, h, w]
    try s.model.net.validateInput(shape, operation: op)
    return try Tensor(borrowing: UnsafeMutablePointer(mutating: try require(x, op, "x")), shape: shape)
}

/// Logits y (N x Cout x D x H x W) for x (N x Cin x D x H x W), D, H, W multiples of 16.
@_cdecl("dfx_session_forward")
public func dfx_session_forward(_ session: OpaquePointer?, _ x: UnsafePointer<Float>?, _ n: Int64, _ d: Int64,
                                _ hh: Int64, _ w: Int64, _ y: UnsafeMutablePointer<Float>?,
                                _ progress: ProgressCallback?, _ user: UnsafeMutableRawPointer?) -> Int32 {
    guarded {
        let op = "session_forward"
        let s = try sessionHandle(session, op)
        let input = try input(s, x, n, d, hh, w, op)
        let (p, c) = callbacks(progress, user, total: DeformUXNet.forwardSteps)
        try s.session.forward(input, into: try require(y, op, "y"), progress: p, cancellation: c)
    }
}

/// Adds the gradients of sum(forward(x) * grad_y) into the model's gradients; grad_x (may be NULL)
/// receives dL/dx.
@_cdecl("dfx_session_backward")
public func dfx_session_backward(_ session: OpaquePointer?, _ x: UnsafePointer<Float>?, _ n: Int64, _ d: Int64,
                                 _ hh: Int64, _ w: Int64, _ gradY: UnsafePointer<Float>?,
                                 _ gradX: UnsafeMutablePointer<Float>?,
                                 _ progress: ProgressCallback?, _ user: UnsafeMutableRawPointer?) -> Int32 {
    guarded {
        let op = "session_backward"
        let s = try sessionHandle(session, op)
        let input = try input(s, x, n, d, hh, w, op)
        let outShape = [input.shape[0], s.model.net.config.outChannels] + Array(input.shape.dropFirst(2))
        let gy = try Tensor(borrowing: UnsafeMutablePointer(mutating: try require(gradY, op, "grad_y")), shape: outShape)
        let (p, c) = callbacks(progress, user, total: 2 * DeformUXNet.forwardSteps)
        try s.session.backward(input, gradOutput: gy, gradInput: gradX, progress: p, cancellation: c)
    }
}

/// Frees the memory a session keeps between calls (activations, scratch, packed weights).
@_cdecl("dfx_session_release_memory")
public func dfx_session_release_memory(_ session: OpaquePointer?) -> Int32 {
    guarded {
        try sessionHandle(session, "session_release_memory").session.releaseMemory()
    }
}

/// Bytes a session keeps between calls.
@_cdecl("dfx_session_retained_bytes")
public func dfx_session_retained_bytes(_ session: OpaquePointer?, _ out: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded {
        let s = try sessionHandle(session, "session_retained_bytes")
        guard let out else { throw DeformUXError.invalidArgument("session_retained_bytes", "out must not be NULL") }
        out.pointee = Int64(s.session.retainedBytes)
    }
}

/// The input and output channel counts of the session's model; either pointer may be NULL.
@_cdecl("dfx_session_channels")
public func dfx_session_channels(_ session: OpaquePointer?, _ inChannels: UnsafeMutablePointer<Int32>?,
                                 _ outChannels: UnsafeMutablePointer<Int32>?) -> Int32 {
    guarded {
        let c = try sessionHandle(session, "session_channels").session.model.config
        inChannels?.pointee = Int32(c.inChannels)
        outChannels?.pointee = Int32(c.outChannels)
    }
}
