// The C ABI of deformux (include/deformux.h): @_cdecl exports only. Each export validates its
// arguments, calls the engine, and maps a thrown DeformUXError to a status code plus a thread-local
// message. Nothing traps or throws across this boundary.
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import DeformUX

// Status codes are DeformUXError.Kind's raw values (deformux.h: DFX_ERR_*); 0 is success.
let DFX_OK: Int32 = 0

/// The engine's version; a static, NUL-terminated literal so dfx_version can hand it out as it is.
let engineVersion: StaticString = "0.1.0"

// MARK: Errors

/// The calling thread's last error, with its fields as C strings that stay valid until the thread's next
/// failing call (dfx_last_error, dfx_last_error_field).
final class LastError {
    let error: DeformUXError
    let text: UnsafeMutablePointer<CChar>?
    let operation: UnsafeMutablePointer<CChar>?
    let expected: UnsafeMutablePointer<CChar>?
    let got: UnsafeMutablePointer<CChar>?
    let path: UnsafeMutablePointer<CChar>?
    let message: UnsafeMutablePointer<CChar>?

    init(_ e: DeformUXError) {
        error = e
        text = strdup(e.description)
        operation = strdup(e.operation)
        message = strdup(e.message)
        expected = e.expected.flatMap { strdup($0) }
        got = e.got.flatMap { strdup($0) }
        path = e.path.flatMap { strdup($0) }
    }

    deinit { for p in [text, operation, expected, got, path, message] { free(p) } }
}

private let lastErrorKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key) { p in
        guard let p else { return }
        Unmanaged<LastError>.fromOpaque(p).release()
    }
    return key
}()

private func setLastError(_ e: DeformUXError) {
    if let old = pthread_getspecific(lastErrorKey) { Unmanaged<LastError>.fromOpaque(old).release() }
    pthread_setspecific(lastErrorKey, Unmanaged.passRetained(LastError(e)).toOpaque())
}

private func lastError() -> LastError? {
    pthread_getspecific(lastErrorKey).map { Unmanaged<LastError>.fromOpaque($0).takeUnretainedValue() }
}

/// Runs `body`, turning every error into a status (the error's kind) and the thread's last error.
func guarded(_ body: () throws -> Void) -> Int32 {
    do {
        try EngineActivity.inside(body)
        return DFX_OK
    } catch let e as DeformUXError {
        setLastError(e)
        return e.kind.rawValue
    } catch {
        setLastError(.internal("", "internal error: \(error)"))
        return DeformUXError.Kind.internal.rawValue
    }
}

/// `guarded`, with every error reported under the entry point's name `op` (its message keeps what the
/// engine said, the file path included).
func guarded(_ op: String, _ body: () throws -> Void) -> Int32 {
    guarded {
        do { try body() } catch let e as DeformUXError { throw e.renamed(operation: op) }
    }
}

func require<T>(_ p: T?, _ op: String, _ name: String) throws -> T {
    guard let p else { throw DeformUXError.invalidArgument(op, "\(name) must not be NULL") }
    return p
}

private func ddcShape(_ op: String, _ n: Int64, _ c: Int64, _ d: Int64, _ h: Int64, _ w: Int64) throws -> DDCShape {
    // Int64 -> Int is exact on the 64-bit platforms Swift runs on; DDCShape checks sign and overflow.
    do {
        return try DDCShape(n: Int(n), c: Int(c), d: Int(d), h: Int(h), w: Int(w))
    } catch let e as DeformUXError {
        throw e.renamed(operation: op)
    }
}

private func offsetMode(_ op: String, _ mode: Int32) throws -> OffsetMode {
    switch mode {
    case 0: return .aligned
    case 1: return .official
    default:
        throw DeformUXError.invalidArgument(op, "offset_mode must be 0 (aligned) or 1 (official), got \(mode)")
    }
}


// MARK: Workspaces

/// A caller-owned workspace for the operator calls (dfx_workspace_*): scratch kept between calls (a DDC
/// at 48^3 x 48 needs about 100 MB of padding, offsets and per-part gradients; allocating them anew on
/// every call costs more than half the operator's time in page faults). One call at a time uses it.
final class WorkspaceHandle {
    let workspace = Workspace()
    let lock = OwnedLock("workspace")
}

/// Runs an operator with the caller's workspace (or, for NULL, one made for this call) and the
/// progress callback as its cancellation.
private func withWorkspace(_ p: OpaquePointer?, _ op: String, _ progress: ProgressCallback?,
                           _ user: UnsafeMutableRawPointer?, _ body: (Workspace) throws -> Void) throws {
    let cancellation = progress.map { f in Cancellation(poll: { report(f, user, 0, 1) }) }
    func run(_ ws: Workspace) throws {
        ws.cancellation = cancellation
        defer { ws.cancellation = nil }
        try body(ws)
    }
    if let p {
        let h = Unmanaged<WorkspaceHandle>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
        try h.lock.withLock(op) { try run(h.workspace) }
    } else {
        try run(Workspace())
    }
}

@_cdecl("dfx_workspace_create")
public func dfx_workspace_create(_ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guarded {
        guard let out else { throw DeformUXError.invalidArgument("workspace_create", "out must not be NULL") }
        out.pointee = OpaquePointer(Unmanaged.passRetained(WorkspaceHandle()).toOpaque())
    }
}

@_cdecl("dfx_workspace_free")
public func dfx_workspace_free(_ ws: OpaquePointer?) {
    guard let ws else { return }
    Unmanaged<WorkspaceHandle>.fromOpaque(UnsafeRawPointer(ws)).release()
}

/// Frees the scratch a workspace keeps (it stays usable).
@_cdecl("dfx_workspace_release")
public func dfx_workspace_release(_ ws: OpaquePointer?) -> Int32 {
    guarded {
        guard let ws else { throw DeformUXError.invalidArgument("workspace_release", "workspace must not be NULL") }
        let h = Unmanaged<WorkspaceHandle>.fromOpaque(UnsafeRawPointer(ws)).takeUnretainedValue()
        try h.lock.withLock("workspace_release") { h.workspace.release() }
    }
}

/// Bytes of scratch a workspace keeps.
@_cdecl("dfx_workspace_bytes")
public func dfx_workspace_bytes(_ ws: OpaquePointer?, _ out: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded {
        guard let ws, let out else { throw DeformUXError.invalidArgument("workspace_bytes", "workspace and out must not be NULL") }
        let h = Unmanaged<WorkspaceHandle>.fromOpaque(UnsafeRawPointer(ws)).takeUnretainedValue()
        out.pointee = Int64(try h.lock.withLock("workspace_bytes") { h.workspace.bytes })
    }
}

@_cdecl("dfx_last_error")
public func dfx_last_error() -> UnsafePointer<CChar> {
    lastError()?.text.map { UnsafePointer($0) } ?? emptyCString
}

/// One field of the calling thread's last error (DFX_FIELD_*), "" when the error has none. Never NULL.
@_cdecl("dfx_last_error_field")
public func dfx_last_error_field(_ field: Int32) -> UnsafePointer<CChar> {
    guard let e = lastError() else { return emptyCString }
    let p: UnsafeMutablePointer<CChar>?
    switch field {
    case 0: p = e.operation
    case 1: p = e.message
    case 2: p = e.expected
    case 3: p = e.got
    case 4: p = e.path
    default: p = nil
    }
    return p.map { UnsafePointer($0) } ?? emptyCString
}

/// The errno of the calling thread's last error (0 if none): ENOENT for a missing file.
@_cdecl("dfx_last_error_errno")
public func dfx_last_error_errno() -> Int32 { lastError()?.error.errno ?? 0 }

private func cString(_ s: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(s.utf8Start).assumingMemoryBound(to: CChar.self)
}
private let emptyCString = cString("")
private let versionCString = cString(engineVersion)

@_cdecl("dfx_version")
public func dfx_version() -> UnsafePointer<CChar> { versionCString }

@_cdecl("dfx_set_num_threads")
public func dfx_set_num_threads(_ n: Int32) -> Int32 {
    guarded { try Threads.setCount(Int(n)) }
}

@_cdecl("dfx_get_num_threads")
public func dfx_get_num_threads() -> Int32 { Int32(Threads.count) }

@_cdecl("dfx_deform_conv3d_forward")
public func dfx_deform_conv3d_forward(
    _ ws: OpaquePointer?, _ x: UnsafePointer<Float>?, _ offsets: UnsafePointer<Float>?, _ weight: UnsafePointer<Float>?,
    _ bias: UnsafePointer<Float>?, _ y: UnsafeMutablePointer<Float>?,
    _ n: Int64, _ c: Int64, _ d: Int64, _ h: Int64, _ w: Int64,
    _ progress: ProgressCallback?, _ user: UnsafeMutableRawPointer?
) -> Int32 {
    guarded {
        let op = "deform_conv3d"
        let shape = try ddcShape(op, n, c, d, h, w)
        let x = try require(x, op, "x"), offsets = try require(offsets, op, "offsets")
        let weight = try require(weight, op, "weight"), y = try require(y, op, "y")
        try withWorkspace(ws, op, progress, user) { ws in
            try DeformConv3d.forward(x: x, offsets: offsets, weight: weight, bias: bias, y: y, shape: shape, workspace: ws)
        }
    }
}

@_cdecl("dfx_deform_conv3d_backward")
public func dfx_deform_conv3d_backward(
    _ ws: OpaquePointer?, _ x: UnsafePointer<Float>?, _ offsets: UnsafePointer<Float>?, _ weight: UnsafePointer<Float>?,
    _ gradY: UnsafePointer<Float>?,
    _ gradX: UnsafeMutablePointer<Float>?, _ gradOffsets: UnsafeMutablePointer<Float>?,
    _ gradWeight: UnsafeMutablePointer<Float>?, _ gradBias: UnsafeMutablePointer<Float>?,
    _ n: Int64, _ c: Int64, _ d: Int64, _ h: Int64, _ w: Int64,
    _ progress: ProgressCallback?, _ user: UnsafeMutableRawPointer?
) -> Int32 {
    guarded {
        let op = "deform_conv3d_backward"
        let shape = try ddcShape(op, n, c, d, h, w)
        let x = try require(x, op, "x"), offsets = try require(offsets, op, "offsets")
        let weight = try require(weight, op, "weight"), gradY = try require(gradY, op, "grad_output")
        // The C ABI overwrites its outputs; the engine accumulates, so start from zero.
        gradX?.initialize(repeating: 0, count: shape.count)
        gradOffsets?.initialize(repeating: 0, count: shape.offsetCount)
        gradWeight?.initialize(repeating: 0, count: shape.weightCount)
        gradBias?.initialize(repeating: 0, count: shape.c)
        try withWorkspace(ws, op, progress, user) { ws in
            try DeformConv3d.backward(x: x, offsets: offsets, weight: weight, gradY: gradY,
                                      gradX: gradX, gradOffsets: gradOffsets, gradWeight: gradWeight,
                                      gradBias: gradBias, shape: shape, workspace: ws)
        }
    }
}

@_cdecl("dfx_ddc_layer_forward")
public func dfx_ddc_layer_forward(
    _ ws: OpaquePointer?, _ x: UnsafePointer<Float>?, _ weight: UnsafePointer<Float>?, _ bias: UnsafePointer<Float>?,
    _ offsetWeight: UnsafePointer<Float>?, _ offsetBias: UnsafePointer<Float>?, _ mode: Int32,
    _ y: UnsafeMutablePointer<Float>?, _ offsetsOut: UnsafeMutablePointer<Float>?,
    _ n: Int64, _ c: Int64, _ d: Int64, _ h: Int64, _ w: Int64,
    _ progress: ProgressCallback?, _ user: UnsafeMutableRawPointer?
) -> Int32 {
    guarded {
        let op = "ddc_layer"
        let shape = try ddcShape(op, n, c, d, h, w)
        let mode = try offsetMode(op, mode)
        let x = try require(x, op, "x"), weight = try require(weight, op, "weight")
        let offsetWeight = try require(offsetWeight, op, "offset_weight")
        let offsetBias = try require(offsetBias, op, "offset_bias"), y = try require(y, op, "y")
        try withWorkspace(ws, op, progress, user) { ws in
            try DDCLayerOps.forward(x: x, weight: weight, bias: bias, offsetWeight: offsetWeight, offsetBias: offsetBias,
                                    mode: mode, y: y, offsetsOut: offsetsOut, shape: shape, workspace: ws)
        }
    }
}

@_cdecl("dfx_ddc_layer_backward")
public func dfx_ddc_layer_backward(
    _ ws: OpaquePointer?, _ x: UnsafePointer<Float>?, _ weight: UnsafePointer<Float>?, _ offsetWeight: UnsafePointer<Float>?,
    _ offsetBias: UnsafePointer<Float>?, _ mode: Int32, _ gradY: UnsafePointer<Float>?,
    _ gradX: UnsafeMutablePointer<Float>?, _ gradWeight: UnsafeMutablePointer<Float>?,
    _ gradBias: UnsafeMutablePointer<Float>?, _ gradOffsetWeight: UnsafeMutablePointer<Float>?,
    _ gradOffsetBias: UnsafeMutablePointer<Float>?,
    _ n: Int64, _ c: Int64, _ d: Int64, _ h: Int64, _ w: Int64,
    _ progress: ProgressCallback?, _ user: UnsafeMutableRawPointer?
) -> Int32 {
    guarded {
        let op = "ddc_layer_backward"
        let shape = try ddcShape(op, n, c, d, h, w)
        let mode = try offsetMode(op, mode)
        let x = try require(x, op, "x"), weight = try require(weight, op, "weight")
        let offsetWeight = try require(offsetWeight, op, "offset_weight")
        let offsetBias = try require(offsetBias, op, "offset_bias")
        let gradY = try require(gradY, op, "grad_output")
        gradX?.initialize(repeating: 0, count: shape.count)
        gradWeight?.initialize(repeating: 0, count: shape.weightCount)
        gradBias?.initialize(repeating: 0, count: shape.c)
        gradOffsetWeight?.initialize(repeating: 0, count: DDCShape.offsetChannels * shape.c)
        gradOffsetBias?.initialize(repeating: 0, count: DDCShape.offsetChannels)
        try withWorkspace(ws, op, progress, user) { ws in
            try DDCLayerOps.backward(x: x, weight: weight, offsetWeight: offsetWeight, offsetBias: offsetBias,
                                     mode: mode, gradY: gradY, gradX: gradX, gradWeight: gradWeight,
                                     gradBias: gradBias, gradOffsetWeight: gradOffsetWeight,
                                     gradOffsetBias: gradOffsetBias, shape: shape, workspace: ws)
        }
    }
}
