#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif
import Synchronization

/// Float32 memory, 64-byte aligned (one AVX-512 vector), owned, borrowed or taken from a pool.
public final class TensorStorage: @unchecked Sendable {
    public let pointer: UnsafeMutablePointer<Float>
    public let count: Int
    private let owned: Bool
    /// Where the memory goes back to when this storage is released (nil: freed).
    private let pool: StoragePool?
    /// For borrowed memory: the object that owns it, kept alive as long as this storage.
    private let owner: AnyObject?

    /// Allocates `count` floats, zero-filled, or (zeroed false) left as the allocator gives them, for
    /// outputs a kernel overwrites in full. With a pool, memory of the same size released earlier is
    /// reused (its values are then whatever the last user left, unless zeroed).
    public init(count: Int, zeroed: Bool = true, pool: StoragePool? = nil) throws {
        guard count >= 0, count <= Int.max / 8 else {
            throw DeformUXError.invalidArgument("Tensor", "cannot allocate \(count) floats")
        }
        var fresh = false
        if let reused = pool?.take(count: count) {
            pointer = reused
        } else {
            guard let p = allocateFloats(count) else {
                pool?.failed(count: count)
                throw DeformUXError.outOfMemory("Tensor", "out of memory allocating \(count) floats (\(count * 4) bytes)")
            }
            pointer = p
            fresh = true
        }
        // Fresh mmap'd memory is already zero.
        if zeroed && !(fresh && count >= mmapFloats) { pointer.initialize(repeating: 0, count: max(count, 1)) }
        self.count = count
        owned = true
        self.pool = pool
        owner = nil
    }

    /// Wraps memory owned by someone else: a NumPy array behind the C ABI (whose owner keeps it alive
    /// for as long as this storage is used), or a region of `owner` (kept alive by this storage).
    public init(borrowing pointer: UnsafeMutablePointer<Float>, count: Int, owner: AnyObject? = nil) {
        self.pointer = pointer
        self.count = count
        owned = false
        pool = nil
        self.owner = owner
    }

    deinit {
        guard owned else { return }
        if let pool { pool.give(pointer, count: count) } else { freeFloats(pointer, count) }
    }
}

/// Allocations of at least this many floats (4 MB) are whole mmap'd pages, given back to the system
/// the moment they are freed: malloc would keep them in its heap once its adaptive mmap threshold has
/// risen, and a process that runs a network grows by every such buffer it ever freed.
let mmapFloats = 1 << 20

/// 64-byte aligned memory for `count` floats, or nil.
func allocateFloats(_ count: Int) -> UnsafeMutablePointer<Float>? {
    let bytes = max(count, 1) * MemoryLayout<Float>.stride
    if count >= mmapFloats {
        guard let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              p != MAP_FAILED else { return nil }
        return p.bindMemory(to: Float.self, capacity: count)
    }
    var raw: UnsafeMutableRawPointer?
    guard posix_memalign(&raw, 64, bytes) == 0, let raw else { return nil }
    return raw.bindMemory(to: Float.self, capacity: max(count, 1))
}

/// Frees memory from `allocateFloats(count)`.
func freeFloats(_ p: UnsafeMutablePointer<Float>, _ count: Int) {
    if count >= mmapFloats {
        munmap(UnsafeMutableRawPointer(p), count * MemoryLayout<Float>.stride)
    } else {
        free(p)
    }
}

/// Released tensor memory kept for reuse, by exact size: a forward pass allocates the same activation
/// sizes again and again (and a sliding-window inference, the same ones for every window), so after
/// the first use they come without allocation, page faults or zeroing.
///
/// The pool never makes the process bigger than the largest live set it has seen: when a new size has
/// to be allocated and the live memory, the retained memory and the new allocation would exceed that
/// high-water mark, retained memory is freed (smallest first) until they fit. `endPass()` frees the
/// sizes a pass did not use, so memory held for another input size does not pile up. Thread-safe.
public final class StoragePool: @unchecked Sendable {
    private var retained: [Int: [UnsafeMutablePointer<Float>]] = [:]
    private var retainedFloats = 0
    /// Floats handed out and not yet given back, and the most there ever were.
    private var liveFloats = 0
    private var highWater = 0
    /// Sizes taken since the last `endPass`.
    private var used = Set<Int>()
    private let mutex = ShortLock()

    public init() {}

    deinit {
        for (count, list) in retained { for p in list { freeFloats(p, count) } }
    }

    /// Memory of exactly `count` floats released earlier, or nil: the caller then allocates `count`
    /// floats itself (and calls `failed` if that fails).
    func take(count: Int) -> UnsafeMutablePointer<Float>? {
        mutex.lock()
        defer { mutex.unlock() }
        used.insert(count)
        liveFloats += count
        if let p = retained[count]?.popLast() {
            retainedFloats -= count
            return p
        }
        let limit = max(highWater, liveFloats)
        while liveFloats + retainedFloats > limit, let size = retained.keys.min() {
            if let p = retained[size]?.popLast() { freeFloats(p, size); retainedFloats -= size }
            if retained[size]?.isEmpty ?? false { retained[size] = nil }
        }
        highWater = max(highWater, liveFloats)
        return nil
    }

    /// The allocation after a miss of `take(count:)` failed.
    func failed(count: Int) {
        mutex.lock()
        defer { mutex.unlock() }
        liveFloats -= count
    }

    func give(_ p: UnsafeMutablePointer<Float>, count: Int) {
        mutex.lock()
        defer { mutex.unlock() }
        liveFloats -= count
        retained[count, default: []].append(p)
        retainedFloats += count
    }

    /// Frees the retained memory of every size not taken since the previous call.
    public func endPass() {
        mutex.lock()
        defer { mutex.unlock() }
        for (count, list) in retained where !used.contains(count) {
            for p in list { freeFloats(p, count) }
            retainedFloats -= count * list.count
            retained[count] = nil
        }
        used.removeAll()
    }

    /// Frees all retained memory.
    public func trim() {
        mutex.lock()
        defer { mutex.unlock() }
        for (count, list) in retained { for p in list { freeFloats(p, count) } }
        retained.removeAll()
        retainedFloats = 0
    }

    /// Bytes handed out and not yet given back, and the most there ever were.
    public var liveBytes: (now: Int, peak: Int) {
        mutex.lock()
        defer { mutex.unlock() }
        return (liveFloats * 4, highWater * 4)
    }

    /// Bytes held for reuse.
    public var retainedBytes: Int {
        mutex.lock()
        defer { mutex.unlock() }
        return retainedFloats * 4
    }
}

/// The engine's one tensor type: float32, a shape, strides in elements and a storage.
///
/// Tensors made by the engine are C-contiguous (the last axis fastest), like PyTorch's N x C x D x H x W.
/// Views are explicit (`reshaped`); copies have names (`copy()`). Kernels take raw pointers and
/// check contiguity once at the layer boundary (`requireContiguous`).
public struct Tensor: @unchecked Sendable {
    public let shape: [Int]
    public let strides: [Int]
    public let storage: TensorStorage
    public let offset: Int

    /// A zero-filled contiguous tensor.
    public init(zeros shape: [Int]) throws {
        let count = try Tensor.elementCount(shape, context: "Tensor")
        self.shape = shape
        strides = Tensor.contiguousStrides(shape)
        storage = try TensorStorage(count: count)
        offset = 0
    }

    /// A contiguous tensor whose values are unspecified: for outputs that a kernel overwrites in full
    /// (skips a pass over memory that the kernel is about to write anyway).
    public init(uninitialized shape: [Int], pool: StoragePool? = nil) throws {
        let count = try Tensor.elementCount(shape, context: "Tensor")
        self.shape = shape
        strides = Tensor.contiguousStrides(shape)
        storage = try TensorStorage(count: count, zeroed: false, pool: pool)
        offset = 0
    }

    /// A contiguous tensor holding `values` (row-major).
    public init(shape: [Int], values: [Float]) throws {
        let count = try Tensor.elementCount(shape, context: "Tensor")
        guard values.count == count else {
            throw DeformUXError.shapeMismatch("Tensor", "shape \(shape) holds \(count) values, got \(values.count)")
        }
        try self.init(zeros: shape)
        values.withUnsafeBufferPointer { src in
            if let base = src.baseAddress { storage.pointer.update(from: base, count: count) }
        }
    }

    /// A contiguous view of memory owned elsewhere.
    public init(borrowing pointer: UnsafeMutablePointer<Float>, shape: [Int]) throws {
        let count = try Tensor.elementCount(shape, context: "Tensor")
        self.shape = shape
        strides = Tensor.contiguousStrides(shape)
        storage = TensorStorage(borrowing: pointer, count: count)
        offset = 0
    }

    init(shape: [Int], strides: [Int], storage: TensorStorage, offset: Int) {
        self.shape = shape
        self.strides = strides
        self.storage = storage
        self.offset = offset
    }

    public var rank: Int { shape.count }
    public var count: Int { shape.reduce(1, *) }
    public var isContiguous: Bool { strides == Tensor.contiguousStrides(shape) }

    /// The first element. Valid for `count` elements when the tensor is contiguous.
    public var pointer: UnsafeMutablePointer<Float> { storage.pointer + offset }

    /// A view with another shape of the same contiguous elements.
    public func reshaped(_ newShape: [Int]) throws -> Tensor {
        try requireContiguous("reshape")
        let n = try Tensor.elementCount(newShape, context: "reshape")
        guard n == count else {
            throw DeformUXError.shapeMismatch("reshape", "\(shape) has \(count) elements, \(newShape) has \(n)")
        }
        return Tensor(shape: newShape, strides: Tensor.contiguousStrides(newShape), storage: storage, offset: offset)
    }

    /// A new contiguous tensor with the same values.
    public func copy() throws -> Tensor {
        let out = try Tensor(zeros: shape)
        var index = [Int](repeating: 0, count: rank)
        let total = count
        for flat in 0..<total {
            var src = offset
            for a in 0..<rank { src += index[a] * strides[a] }
            out.storage.pointer[flat] = storage.pointer[src]
            var a = rank - 1
            while a >= 0 {
                index[a] += 1
                if index[a] < shape[a] { break }
                index[a] = 0
                a -= 1
            }
        }
        return out
    }

    /// The values in row-major order.
    public func toArray() throws -> [Float] {
        let c = isContiguous ? self : try copy()
        return Array(UnsafeBufferPointer(start: c.pointer, count: c.count))
    }

    public subscript(_ index: Int...) -> Float {
        get {
            var i = offset
            for a in 0..<rank { i += index[a] * strides[a] }
            return storage.pointer[i]
        }
        nonmutating set {
            var i = offset
            for a in 0..<rank { i += index[a] * strides[a] }
            storage.pointer[i] = newValue
        }
    }

    public func requireContiguous(_ operation: String) throws {
        guard isContiguous else {
            throw DeformUXError.invalidArgument(operation, "expected a contiguous tensor, got strides \(strides) for shape \(shape)")
        }
    }

    public static func contiguousStrides(_ shape: [Int]) -> [Int] {
        var strides = [Int](repeating: 1, count: shape.count)
        var s = 1
        for a in stride(from: shape.count - 1, through: 0, by: -1) {
            strides[a] = s
            s *= max(shape[a], 1)
        }
        return strides
    }

    /// The product of `shape`, checked for negative sizes and overflow.
    public static func elementCount(_ shape: [Int], context: String) throws -> Int {
        var n = 1
        for s in shape {
            guard s >= 0 else {
                throw DeformUXError.invalidArgument(context, "negative size in shape \(shape)")
            }
            let (p, overflow) = n.multipliedReportingOverflow(by: s)
            guard !overflow, p <= Int.max / 8 else {
                throw DeformUXError.invalidArgument(context, "shape \(shape) is too large")
            }
            n = p
        }
        return n
    }
}

/// Reusable scratch memory for kernels, grown on demand and kept between calls so that hot loops
/// never allocate, and the caller's `cancellation`, which kernels consult in their block loops. It
/// belongs to whoever runs the kernels (a session, a trainer, a C ABI caller); not shared between
/// concurrent calls.
public final class Workspace: @unchecked Sendable {
    private var buffers: [String: TensorStorage] = [:]
    /// Floats held in `buffers`, readable from any thread (`bytes`) while the owner changes them.
    private let heldFloats = Atomic<Int>(0)
    /// Set by the runner for the duration of a call that can be cancelled.
    public var cancellation: Cancellation?
    /// Where the buffers come from: a runner's activation pool, so that scratch and activations share
    /// one memory budget (scratch displaces retained activation memory instead of adding to it).
    private let pool: StoragePool?

    public init(pool: StoragePool? = nil) { self.pool = pool }

    /// Whether the running call should stop early (see `Cancellation.stopRequested`).
    @inline(__always) public func stopRequested() -> Bool { cancellation?.stopRequested() ?? false }

    /// Throws `.cancelled` if the running call was asked to stop.
    public func throwIfCancelled(_ operation: String) throws {
        try cancellation?.throwIfCancelled(operation, "while running")
    }

    /// At least `count` floats under `name`. The contents are whatever the last user left.
    public func buffer(_ name: String, count: Int) throws -> UnsafeMutablePointer<Float> {
        if let b = buffers[name], b.count >= count { return b.pointer }
        if let old = buffers.removeValue(forKey: name) { heldFloats.subtract(old.count, ordering: .relaxed) }
        let b = try TensorStorage(count: count, zeroed: false, pool: pool)
        buffers[name] = b
        heldFloats.add(b.count, ordering: .relaxed)
        return b.pointer
    }

    /// Bytes currently held. Safe to read from any thread, also while the owner runs a call (a
    /// session's `retainedBytes`): it reads a counter, never the buffers themselves.
    public var bytes: Int { heldFloats.load(ordering: .relaxed) * 4 }

    public func release() {
        buffers.removeAll()
        heldFloats.store(0, ordering: .relaxed)
    }

    /// Frees the buffers whose names start with one of `prefixes` (e.g. a phase's scratch that the
    /// next phase does not use, so that it does not add to the peak).
    public func release(prefixes: [String]) {
        for name in buffers.keys where prefixes.contains(where: { name.hasPrefix($0) }) {
            if let old = buffers.removeValue(forKey: name) { heldFloats.subtract(old.count, ordering: .relaxed) }
        }
    }
}
