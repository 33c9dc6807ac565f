// The network behind an opaque handle (deformux.h: dfx_model_*). One handle serialises its own calls
// (a model's workspace is reused between calls); different handles run concurrently.
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
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    /// C copies of the parameter names, alive as long as the handle (nil only if strdup failed).
    let names: [UnsafeMutablePointer<CChar>?]
    /// The report of the last load, as text.
    var lastReport = ""

    init(_ net: DeformUXNet) {
        self.net = net
        pthread_mutex_init(mutex, nil)
        names = net.parameters.layout.entries.map { strdup($0.name) }
    }

    deinit {
        for p in names { free(p) }
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// Parameter `index` of the layout, checked.
    func entry(_ index: Int64, _ op: String) throws -> ParameterLayout.Entry {
        let entries = net.parameters.layout.entries
        guard index >= 0, index < Int64(entries.count) else {
            throw DeformUXError.invalidArgument(op, "index must be in 0..<\(entries.count), got \(index)")
        }
        return entries[Int(index)]
    }

    func locked<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body()
    }
}

private func handle(_ p: OpaquePointer?, _ op: String) throws -> ModelHandle {
    guard let p else { throw DeformUXError.invalidArgument(op, "model must not be NULL") }
    return Unmanaged<ModelHandle>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

private func string(_ p: UnsafePointer<CChar>?, _ op: String, _ name: String) throws -> String {
    guard let p else { throw DeformUXError.invalidArgument(op, "\(name) must not be NULL") }
    return String(cString: p)
}

/// Copies `text` (NUL-terminated) into buf if it fits; always reports the bytes needed.
private func copyOut(_ text: String, _ buf: UnsafeMutablePointer<CChar>?, _ cap: Int64, _ needed: UnsafeMutablePointer<Int64>?) {
    let bytes = Array(text.utf8)
    needed?.pointee = Int64(bytes.count + 1)
    guard let buf, cap >= Int64(bytes.count + 1) else { return }
    bytes.withUnsafeBufferPointer { b in
        if let base = b.baseAddress { UnsafeMutableRawPointer(buf).copyMemory(from: base, byteCount: b.count) }
    }
    buf[bytes.count] = 0
}

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
    guarded { copyOut(try handle(model, "model_config_json").net.config.json, buf, cap, needed) }
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

/// Copies parameter `index` (count floats) into out.
@_cdecl("dfx_model_get_tensor")
public func dfx_model_get_tensor(_ model: OpaquePointer?, _ index: Int64, _ out: UnsafeMutablePointer<Float>?,
                                 _ count: Int64) -> Int32 {
    guarded {
        let op = "model_get_tensor"
        let h = try handle(model, op)
        let e = try h.entry(index, op)
        guard let out else { throw DeformUXError.invalidArgument(op, "out must not be NULL") }
        guard count == Int64(e.count) else {
            throw DeformUXError.shapeMismatch(op, "\(e.name) has \(e.count) values, the buffer holds \(count)")
        }
        h.locked { out.update(from: h.net.parameters.values.pointer + e.offset, count: e.count) }
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
        guard count >= 0 else { throw DeformUXError.invalidArgument(op, "count must be >= 0, got \(count)") }
        var items: [Safetensors.Item] = []
        if count > 0 {
            guard let names, let data, let ranks, let shapes else {
                throw DeformUXError.invalidArgument(op, "names, data, ranks and shapes must not be NULL")
            }
            for i in 0..<Int(count) {
                let name = try string(names[i], op, "names[\(i)]")
                guard let values = data[i] else { throw DeformUXError.invalidArgument(op, "data for \(name) is NULL") }
                let r = Int(ranks[i])
                guard (0...8).contains(r) else { throw DeformUXError.invalidArgument(op, "\(name) has rank \(r), at most 8") }
                let shape = (0..<r).map { Int(shapes[8 * i + $0]) }
                items.append(Safetensors.Item(name: name, shape: shape, values: values))
            }
        }
        try h.locked {
            let report = try h.net.loadStateDict(items, strict: strict != 0)
            h.lastReport = report.description
        }
    }
}

@_cdecl("dfx_model_load")
public func dfx_model_load(_ model: OpaquePointer?, _ path: UnsafePointer<CChar>?, _ strict: Int32) -> Int32 {
    guarded {
        let h = try handle(model, "model_load")
        let p = try string(path, "model_load", "path")
        try h.locked { h.lastReport = try h.net.load(from: p, strict: strict != 0).description }
    }
}

/// The text report of the last load (counts, then the missing, unexpected and mis-shaped names).
@_cdecl("dfx_model_last_report")
public func dfx_model_last_report(_ model: OpaquePointer?, _ buf: UnsafeMutablePointer<CChar>?, _ cap: Int64,
                                  _ needed: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded {
        let h = try handle(model, "model_last_report")
        copyOut(h.locked { h.lastReport }, buf, cap, needed)
    }
}

@_cdecl("dfx_model_save")
public func dfx_model_save(_ model: OpaquePointer?, _ path: UnsafePointer<CChar>?) -> Int32 {
    guarded {
        let h = try handle(model, "model_save")
        let p = try string(path, "model_save", "path")
        try h.locked { try h.net.save(to: p) }
    }
}

/// Called between steps of a long call with (done, total); returns non-zero to cancel.
public typealias ProgressCallback = @convention(c) (UnsafeMutableRawPointer?, Int64, Int64) -> Int32

/// Logits y (N x Cout x D x H x W) for x (N x Cin x D x H x W), D, H, W multiples of 16.
@_cdecl("dfx_model_forward")
public func dfx_model_forward(_ model: OpaquePointer?, _ x: UnsafePointer<Float>?, _ n: Int64, _ d: Int64,
                              _ hh: Int64, _ w: Int64, _ y: UnsafeMutablePointer<Float>?,
                              _ progress: ProgressCallback?, _ user: UnsafeMutableRawPointer?) -> Int32 {
    guarded {
        let op = "model_forward"
        let h = try handle(model, op)
        guard let x, let y else { throw DeformUXError.invalidArgument(op, "x and y must not be NULL") }
        let c = h.net.config
        let shape = [Int(n), c.inChannels, Int(d), Int(hh), Int(w)]
        try h.net.validateInput(shape)
        let input = try Tensor(borrowing: UnsafeMutablePointer(mutating: x), shape: shape)
        try h.locked {
            try h.net.forward(input, into: y,
                              progress: progress.map { cb in { done, total in cb(user, Int64(done), Int64(total)) == 0 } })
        }
    }
}

/// Frees the memory a model keeps between calls (activations, scratch).
@_cdecl("dfx_model_release_memory")
public func dfx_model_release_memory(_ model: OpaquePointer?) -> Int32 {
    guarded {
        let h = try handle(model, "model_release_memory")
        h.locked { h.net.releaseMemory() }
    }
}

/// The per-module summary for an input N x Cin x D x H x W, as text.
@_cdecl("dfx_model_summary")
public func dfx_model_summary(_ model: OpaquePointer?, _ n: Int64, _ d: Int64, _ hh: Int64, _ w: Int64,
                              _ buf: UnsafeMutablePointer<CChar>?, _ cap: Int64, _ needed: UnsafeMutablePointer<Int64>?) -> Int32 {
    guarded {
        let h = try handle(model, "model_summary")
        let s = try h.net.summary(inputShape: [Int(n), h.net.config.inChannels, Int(d), Int(hh), Int(w)])
        copyOut(s.description, buf, cap, needed)
    }
}
