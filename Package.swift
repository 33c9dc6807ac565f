// swift-tools-version:6.0
// deformux: DeformUX-Net on the CPU. See README.md and ../shared/design for the contracts.
//
// Tuning flags (a CPU target for AVX-512, -static-stdlib for the Python library) are passed on the
// command line by python/setup.py and scripts/, never as unsafeFlags here: unsafeFlags would make this
// package unusable as a versioned dependency.
import PackageDescription

let engineSettings: [SwiftSetting] = [
    // The kernels hand raw buffers to worker threads; Swift 6's Sendable checking has no way to see
    // that the index ranges are disjoint, so the engine compiles in Swift 5 mode.
    .swiftLanguageMode(.v5),
]

let package = Package(
    name: "deformux",
    products: [
        .library(name: "DeformUX", targets: ["DeformUX"]),
        .library(name: "DeformUXC", type: .dynamic, targets: ["DeformUXC"]),
        .executable(name: "deformux", targets: ["deformux"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .systemLibrary(
            name: "COpenBLAS",
            path: "Sources/COpenBLAS",
            pkgConfig: "openblas",
            providers: [.apt(["libopenblas-dev", "pkg-config"])]
        ),
        .systemLibrary(
            name: "CZlib",
            path: "Sources/CZlib",
            pkgConfig: "zlib",
            providers: [.apt(["zlib1g-dev"])]
        ),
        .target(
            name: "DeformUX",
            dependencies: ["COpenBLAS", "CZlib"],
            exclude: ["README.md", "Tensor/README.md", "Kernels/README.md", "Kernels/Reference/README.md", "Layers/README.md", "Model/README.md",
                      "IO/README.md", "Training/README.md", "Pipeline/README.md"],
            swiftSettings: engineSettings
        ),
        .target(
            name: "DeformUXC",
            dependencies: ["DeformUX"],
            exclude: ["include", "README.md"],
            swiftSettings: engineSettings
        ),
        .executableTarget(
            name: "deformux",
            dependencies: [
                "DeformUX",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            swiftSettings: engineSettings
        ),
        .testTarget(
            name: "DeformUXTests",
            dependencies: ["DeformUX"],
            swiftSettings: engineSettings
        ),
    ]
)
