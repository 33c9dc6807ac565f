#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Float32 memory, 64-byte aligned (one AVX-512 vector), owned or borrowed.
public final class TensorStorage: @unchecked Sendable {
    public let pointer: UnsafeMutablePointer<Float>
    public let count: Int
    private let owned: Bool

    /// Allocates `count` floats, zero-filled.
    public init(count: Int) throws {
        guard count >= 0, count <= Int.max / 8 else {
            throw DeformUXError.invalidArgument("Tensor: cannot allocate \(count) floats")
        }
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, 64, max(count, 1) * MemoryLayout<Float>.stride) == 0, let raw else {
            throw DeformUXError.outOfMemory("Tensor: out of memory allocating \(count) floats (\(count * 4) bytes)")
        }
        pointer = raw.bindMemory(to: Float.self, capacity: max(count, 1))
        pointer.initialize(repeating: 0, count: max(count, 1))
        self.count = count
        owned = true
    }

    /// Wraps memory owned by someone else (a NumPy array behind the C ABI). The owner keeps it alive
    /// for as long as this storage is used.
    public init(borrowing pointer: UnsafeMutablePointer<Float>, count: Int) {
        self.pointer = pointer
        self.count = count
        owned = false
    }

    deinit { if owned { free(pointer) } }
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

    /// A contiguous tensor holding `values` (row-major).
    public init(shape: [Int], values: [Float]) throws {
        let count = try Tensor.elementCount(shape, context: "Tensor")
        guard values.count == count else {
            throw DeformUXError.shapeMismatch("Tensor: shape \(shape) holds \(count) values, got \(values.count)")
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
            throw DeformUXError.shapeMismatch("reshape: \(shape) has \(count) elements, \(newShape) has \(n)")
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
            throw DeformUXError.invalidArgument("\(operation): expected a contiguous tensor, got strides \(strides) for shape \(shape)")
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
                throw DeformUXError.invalidArgument("\(context): negative size in shape \(shape)")
            }
            let (p, overflow) = n.multipliedReportingOverflow(by: s)
            guard !overflow, p <= Int.max / 8 else {
                throw DeformUXError.invalidArgument("\(context): shape \(shape) is too large")
            }
            n = p
        }
        return n
    }
}

/// Reusable scratch memory for kernels, grown on demand and kept between calls so that hot loops
/// never allocate. One workspace per layer (or per caller); not shared between concurrent calls.
public final class Workspace: @unchecked Sendable {
    private var buffers: [String: TensorStorage] = [:]

    public init() {}

    /// At least `count` floats under `name`. The contents are whatever the last user left.
    public func buffer(_ name: String, count: Int) throws -> UnsafeMutablePointer<Float> {
        if let b = buffers[name], b.count >= count { return b.pointer }
        buffers[name] = nil
        let b = try TensorStorage(count: count)
        buffers[name] = b
        return b.pointer
    }

    /// Bytes currently held.
    public var bytes: Int { buffers.values.reduce(0) { $0 + $1.count * 4 } }

    public func release() { buffers.removeAll() }
}
