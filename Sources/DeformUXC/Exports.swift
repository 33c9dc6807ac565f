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

// Status codes: keep in step with deformux.h.
let DFX_OK: Int32 = 0
let DFX_ERR_INVALID_ARGUMENT: Int32 = 1
let DFX_ERR_SHAPE: Int32 = 2
let DFX_ERR_OUT_OF_MEMORY: Int32 = 3
let DFX_ERR_IO: Int32 = 4
let DFX_ERR_CANCELLED: Int32 = 5
let DFX_ERR_INTERNAL: Int32 = 6

/// The engine's version; a static, NUL-terminated literal so dfx_version can hand it out as it is.
let engineVersion: StaticString = "0.1.0"

// MARK: Errors

/// The thread's last error message, a malloc'd C string owned by the thread-specific slot.
private let lastErrorKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key) { free($0) }
    return key
}()

private func setLastError(_ message: String) {
    if let old = pthread_getspecific(lastErrorKey) { free(old) }
    pthread_setspecific(lastErrorKey, strdup(message))
}

/// Runs `body`, turning every error into a status and a message.
func guarded(_ body: () throws -> Void) -> Int32 {
    do {
        try body()
        return DFX_OK
    } catch let e as DeformUXError {
        setLastError(e.message)
        switch e {
        case .invalidArgument: return DFX_ERR_INVALID_ARGUMENT
        case .shapeMismatch: return DFX_ERR_SHAPE
        case .outOfMemory: return DFX_ERR_OUT_OF_MEMORY
        case .io: return DFX_ERR_IO
        case .cancelled: return DFX_ERR_CANCELLED
        case .internal: return DFX_ERR_INTERNAL
        }
    } catch {
        setLastError("internal error: \(error)")
        return DFX_ERR_INTERNAL
    }
}

private func require<T>(_ p: T?, _ op: String, _ name: String) throws -> T {
    guard let p else { throw DeformUXError.invalidArgument("\(op): \(name) must not be NULL") }
    return p
}

private func ddcShape(_ op: String, _ n: Int64, _ c: Int64, _ d: Int64, _ h: Int64, _ w: Int64) throws -> DDCShape {
    // Int64 -> Int is exact on the 64-bit platforms Swift runs on; DDCShape checks sign and overflow.
    do {
        return try DDCShape(n: Int(n), c: Int(c), d: Int(d), h: Int(h), w: Int(w))
    } catch let DeformUXError.invalidArgument(m) {
        throw DeformUXError.invalidArgument(m.replacingPrefix("deform_conv3d", with: op))
    }
}

private func offsetMode(_ op: String, _ mode: Int32) throws -> OffsetMode {
    switch mode {
    case 0: return .aligned
    case 1: return .official
    default:
        throw DeformUXError.invalidArgument("\(op): offset_mode must be 0 (aligned) or 1 (official), got \(mode)")
    }
}

extension String {
    func replacingPrefix(_ prefix: String, with other: String) -> String {
        hasPrefix(prefix) ? other + dropFirst(prefix.count) : self
    }
}

// MARK: Scratch memory

/// The calling thread's scratch for the operator calls: kept between calls (a DDC at 48^3 x 48 needs
/// about 100 MB of padding, offsets and per-part gradients; allocating them anew on every call costs
/// more than half the operator's time in page faults), freed with the thread or by
/// dfx_release_thread_memory.
private let workspaceKey: pthread_key_t = {
    var key = pthread_key_t()
    pthread_key_create(&key) { p in
        guard let p else { return }
        Unmanaged<Workspace>.fromOpaque(p).release()
    }
    return key
}()

func threadWorkspace() -> Workspace {
    if let p = pthread_getspecific(workspaceKey) {
        return Unmanaged<Workspace>.fromOpaque(p).takeUnretainedValue()
    }
    let w = Workspace()
    pthread_setspecific(workspaceKey, Unmanaged.passRetained(w).toOpaque())
    return w
}

// MARK: Exports

@_cdecl("dfx_release_thread_memory")
public func dfx_release_thread_memory() -> Int32 {
    guarded {
        if let p = pthread_getspecific(workspaceKey) {
            Unmanaged<Workspace>.fromOpaque(p).takeUnretainedValue().release()
        }
    }
}

@_cdecl("dfx_last_error")
public func dfx_last_error() -> UnsafePointer<CChar> {
    if let p = pthread_getspecific(lastErrorKey) { return UnsafePointer(p.assumingMemoryBound(to: CChar.self)) }
    return emptyCString
}

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
    _ x: UnsafePointer<Float>?, _ offsets: UnsafePointer<Float>?, _ weight: UnsafePointer<Float>?,
    _ bias: UnsafePointer<Float>?, _ y: UnsafeMutablePointer<Float>?,
    _ n: Int64, _ c: Int64, _ d: Int64, _ h: Int64, _ w: Int64
) -> Int32 {
    guarded {
        let op = "deform_conv3d"
        let shape = try ddcShape(op, n, c, d, h, w)
        try DeformConv3d.forward(x: require(x, op, "x"), offsets: require(offsets, op, "offsets"),
                                 weight: require(weight, op, "weight"), bias: bias,
                                 y: require(y, op, "y"), shape: shape, workspace: threadWorkspace())
    }
}

@_cdecl("dfx_deform_conv3d_backward")
public func dfx_deform_conv3d_backward(
    _ x: UnsafePointer<Float>?, _ offsets: UnsafePointer<Float>?, _ weight: UnsafePointer<Float>?,
    _ gradY: UnsafePointer<Float>?,
    _ gradX: UnsafeMutablePointer<Float>?, _ gradOffsets: UnsafeMutablePointer<Float>?,
    _ gradWeight: UnsafeMutablePointer<Float>?, _ gradBias: UnsafeMutablePointer<Float>?,
    _ n: Int64, _ c: Int64, _ d: Int64, _ h: Int64, _ w: Int64
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
        try DeformConv3d.backward(x: x, offsets: offsets, weight: weight, gradY: gradY,
                                  gradX: gradX, gradOffsets: gradOffsets, gradWeight: gradWeight,
                                  gradBias: gradBias, shape: shape, workspace: threadWorkspace())
    }
}

@_cdecl("dfx_ddc_layer_forward")
public func dfx_ddc_layer_forward(
    _ x: UnsafePointer<Float>?, _ weight: UnsafePointer<Float>?, _ bias: UnsafePointer<Float>?,
    _ offsetWeight: UnsafePointer<Float>?, _ offsetBias: UnsafePointer<Float>?, _ mode: Int32,
    _ y: UnsafeMutablePointer<Float>?, _ offsetsOut: UnsafeMutablePointer<Float>?,
    _ n: Int64, _ c: Int64, _ d: Int64, _ h: Int64, _ w: Int64
) -> Int32 {
    guarded {
        let op = "ddc_layer"
        let shape = try ddcShape(op, n, c, d, h, w)
        let mode = try offsetMode(op, mode)
        try DDCLayerOps.forward(x: require(x, op, "x"), weight: require(weight, op, "weight"), bias: bias,
                                offsetWeight: require(offsetWeight, op, "offset_weight"),
                                offsetBias: require(offsetBias, op, "offset_bias"), mode: mode,
                                y: require(y, op, "y"), offsetsOut: offsetsOut, shape: shape,
                                workspace: threadWorkspace())
    }
}

@_cdecl("dfx_ddc_layer_backward")
public func dfx_ddc_layer_backward(
    _ x: UnsafePointer<Float>?, _ weight: UnsafePointer<Float>?, _ offsetWeight: UnsafePointer<Float>?,
    _ offsetBias: UnsafePointer<Float>?, _ mode: Int32, _ gradY: UnsafePointer<Float>?,
    _ gradX: UnsafeMutablePointer<Float>?, _ gradWeight: UnsafeMutablePointer<Float>?,
    _ gradBias: UnsafeMutablePointer<Float>?, _ gradOffsetWeight: UnsafeMutablePointer<Float>?,
    _ gradOffsetBias: UnsafeMutablePointer<Float>?,
    _ n: Int64, _ c: Int64, _ d: Int64, _ h: Int64, _ w: Int64
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
        try DDCLayerOps.backward(x: x, weight: weight, offsetWeight: offsetWeight, offsetBias: offsetBias,
                                 mode: mode, gradY: gradY, gradX: gradX, gradWeight: gradWeight,
                                 gradBias: gradBias, gradOffsetWeight: gradOffsetWeight,
                                 gradOffsetBias: gradOffsetBias, shape: shape, workspace: threadWorkspace())
    }
}
